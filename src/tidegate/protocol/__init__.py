"""Sans-I/O protocol code: bytes in, frames/events out. Nothing here touches a socket."""
