"""The project's expected-failure exceptions (a leaf module: imports nothing).

Each message is one line that names what was wrong and what to do; the CLIs print it as
``prog: error: <Type>: <message>`` and exit 2 (sparsejax/cli_common.py)."""


class ConfigError(ValueError):
  """A config value is unknown, mistyped or inconsistent. The message is one line."""


class CheckpointError(RuntimeError):
  """A checkpoint is missing, torn or does not fit the run."""
