"""Built-in applications that run on the engine."""
