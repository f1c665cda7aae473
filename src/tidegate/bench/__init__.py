import argparse

def add_arguments(p: argparse.ArgumentParser) -> None:
    pass

def run(a: argparse.Namespace) -> int:
    return 0
