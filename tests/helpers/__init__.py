"""What the tests share: running the CLI, data and images, checkpoints, a server, the harnesses that kill runs and
make network namespaces. Each module names what it holds; `tests/` is on the path (pyproject's `pythonpath`)."""
