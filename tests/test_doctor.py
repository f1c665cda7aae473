"""`tidegate doctor`: this host's real /proc, and /proc trees of other hosts written as input."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tidegate import doctor
from tidegate.engine.limits import per_worker_capacity, raise_nofile, workers_for

KEYS = {
    "limits", "capacity_connections", "capped_by", "requested_connections", "fits", "reason",
    "workers_needed", "per_worker_capacity",
}
LIMIT_NAMES = {
    "nofile", "nr_open", "file-max", "memory", "tcp_mem", "max_map_count", "somaxconn",
    "ip_local_port_range", "netdev_max_backlog",
}


def write_proc(
    root: Path,
    nofile: tuple[int, int] = (1_048_576, 1_048_576),
    nr_open: int = 1_048_576,
    file_max: int = 9_223_372_036_854_775_807,
    ports: tuple[int, int] = (32768, 60999),
    somaxconn: int = 4096,
    tcp_mem: tuple[int, int, int] = (1_000_000, 2_000_000, 3_000_000),
    mem_available_kb: int = 64 * 1024 * 1024,
    max_map_count: int = 65530,
    netdev_max_backlog: int = 1000,
) -> Path:
    """A host's /proc, as the files doctor reads."""
    files = {
        "proc/self/limits": "Limit                     Soft Limit           Hard Limit           Units\n"
        f"Max open files            {nofile[0]:<20} {nofile[1]:<20} files\n",
        "proc/sys/fs/nr_open": f"{nr_open}\n",
        "proc/sys/fs/file-max": f"{file_max}\n",
        "proc/sys/fs/file-nr": f"1000\t0\t{file_max}\n",
        "proc/sys/net/ipv4/ip_local_port_range": f"{ports[0]}\t{ports[1]}\n",
        "proc/sys/net/core/somaxconn": f"{somaxconn}\n",
        "proc/sys/net/ipv4/tcp_mem": "\t".join(map(str, tcp_mem)) + "\n",
        "proc/meminfo": f"MemTotal:       {mem_available_kb + 1024} kB\n"
        f"MemFree:        {mem_available_kb // 2} kB\n"
        f"MemAvailable:   {mem_available_kb} kB\n",
        "proc/sys/vm/max_map_count": f"{max_map_count}\n",
        "proc/sys/net/core/netdev_max_backlog": f"{netdev_max_backlog}\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def run_doctor(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    return doctor.run(parser.parse_args(argv))


def row(report: doctor.Report, name: str) -> doctor.Limit:
    return next(r for r in report.limits if r.name == name)


# --- this host's real /proc ---------------------------------------------------------------


def test_real_host_reads_every_limit() -> None:
    limits = raise_nofile()
    host = doctor.read_host("/")
    assert (host.nofile_soft, host.nofile_hard) == (limits.soft, limits.hard)
    assert host.nofile_soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert host.nofile_hard <= host.nr_open
    assert 0 < host.files_in_use < host.file_max
    assert 1024 <= host.port_range[0] < host.port_range[1] <= 65535
    assert host.somaxconn > 0 and host.max_map_count > 0
    assert host.tcp_mem[0] <= host.tcp_mem[1] <= host.tcp_mem[2]
    assert host.mem_available > 0


def test_real_host_fits_500k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "doctor.json"
    assert run_doctor("--connections", "500000", "--json", str(out)) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert KEYS <= report.keys()
    assert {r["name"] for r in report["limits"]} == LIMIT_NAMES
    assert report["fits"] is True and report["requested_connections"] == 500_000
    assert report["capacity_connections"] >= 500_000
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert report["per_worker_capacity"] == per_worker_capacity(soft)
    assert report["workers_needed"] == workers_for(500_000, per_worker_capacity(soft))
    by_name = {r["name"]: r for r in report["limits"]}
    assert by_name["memory"]["allows"] >= 500_000 and by_name["file-max"]["allows"] >= 500_000
    assert [r["name"] for r in report["limits"] if r["binding"]] == [report["capped_by"]]
    for line in ("can promise", f"capped by {report['capped_by']}", "FITS: 500,000"):
        assert line in text
    assert f"need {report['workers_needed']} workers" in text


def test_real_host_does_not_fit_50m(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_doctor("--connections", "50000000", "--json", "-") == 1
    report = json.loads(capsys.readouterr().out)  # '-': JSON only, so stdout parses
    assert report["fits"] is False
    assert report["capacity_connections"] < 50_000_000
    assert report["reason"].startswith(f"50,000,000 connections exceed {report['capped_by']}")


def test_cli_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "doctor.json"
    cmd = [sys.executable, "-m", "tidegate", "doctor"]
    ok = subprocess.run([*cmd, "--connections", "500000", "--json", str(out)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "FITS: 500,000" in ok.stdout
    assert KEYS <= json.loads(out.read_text()).keys()
    too_many = subprocess.run([*cmd, "--connections", "50000000"],
                              capture_output=True, text=True, timeout=60)
    assert too_many.returncode == 1, too_many.stderr
    assert "DOES NOT FIT: 50,000,000 connections exceed" in too_many.stdout


# --- other hosts, as /proc trees ----------------------------------------------------------


def test_1m_nofile_host_needs_only_cores_workers(tmp_path: Path) -> None:
    host = doctor.read_host(write_proc(tmp_path), cores=2)
    report = doctor.assess(host, 500_000)
    assert report.fits and report.workers_needed == 2
    assert report.per_worker_capacity == per_worker_capacity(1_048_576)
    assert doctor.assess(doctor.read_host(tmp_path, cores=8), 500_000).workers_needed == 8


def test_20k_nofile_host_needs_many_workers_and_says_1m_needs_fewer(tmp_path: Path) -> None:
    host = doctor.read_host(write_proc(tmp_path, nofile=(20_000, 20_000)), cores=2)
    report = doctor.assess(host, 500_000)
    assert report.fits and report.workers_needed == 27
    assert report.workers_needed_at_max_nofile == 2
    assert "ulimit -n 1048576" in row(report, "nofile").fix
    assert "with nofile raised to 1,048,576 (fs.nr_open): 2 workers" in doctor.render(report)


def test_small_file_max_caps_the_host(tmp_path: Path) -> None:
    report = doctor.assess(doctor.read_host(write_proc(tmp_path, file_max=201_000)), 500_000)
    assert report.capped_by == "file-max" and report.capacity_connections == 200_000
    assert not report.fits
    assert report.reason == "500,000 connections exceed file-max (allows 200,000)"
    assert row(report, "file-max").fix == "sysctl -w fs.file-max=1000000"
    assert "DOES NOT FIT: 500,000 connections exceed file-max" in doctor.render(report)


def test_memory_and_tcp_mem_caps(tmp_path: Path) -> None:
    small = write_proc(tmp_path / "a", mem_available_kb=2 * 1024 * 1024)  # 2 GiB
    report = doctor.assess(doctor.read_host(small), 500_000)
    assert report.capped_by == "memory" and not report.fits
    per_conn = doctor.USER_BYTES_PER_CONN + doctor.KERNEL_BYTES_PER_CONN
    assert report.capacity_connections < 2 * 1024**3 // per_conn
    tcp = write_proc(tmp_path / "b", tcp_mem=(100_000, 200_000, 300_000))
    report = doctor.assess(doctor.read_host(tcp), 500_000)
    assert report.capped_by == "tcp_mem" and report.capacity_connections == 300_000
    assert row(report, "tcp_mem").fix == 'sysctl -w net.ipv4.tcp_mem="208333 416666 625000"'


def test_warnings_do_not_cap_held_connections(tmp_path: Path) -> None:
    root = write_proc(tmp_path, somaxconn=128, ports=(60000, 60999))
    report = doctor.assess(doctor.read_host(root), 500_000)
    assert report.fits
    for name in ("somaxconn", "ip_local_port_range", "nr_open", "netdev_max_backlog"):
        assert row(report, name).allows is None and not row(report, name).binding
    ports = row(report, "ip_local_port_range")
    assert "1,000 connections per client source address" in ports.note
    assert "500 source addresses" in ports.note and "ip_local_port_range=" in ports.fix
    assert "net.core.somaxconn=65535" in row(report, "somaxconn").fix
    assert "net.core.netdev_max_backlog=65536" in row(report, "netdev_max_backlog").fix


def test_nofile_below_reserve_serves_nothing(tmp_path: Path) -> None:
    report = doctor.assess(doctor.read_host(write_proc(tmp_path, nofile=(200, 200))), 1)
    assert not report.fits and report.capped_by == "nofile" and report.capacity_connections == 0
    assert report.workers_needed is None
    assert "raise RLIMIT_NOFILE" in doctor.assess(doctor.read_host(tmp_path), 0).reason


def test_tiny_max_map_count_caps_each_worker(tmp_path: Path) -> None:
    report = doctor.assess(doctor.read_host(write_proc(tmp_path, max_map_count=1034)), 500_000)
    assert row(report, "max_map_count").per_worker == 5120 == report.per_worker_capacity
    assert doctor.assess(doctor.read_host(write_proc(tmp_path)), 1).per_worker_capacity == (
        per_worker_capacity(1_048_576)
    )
