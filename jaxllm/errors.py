"""Every user-facing error of jaxllm, in one place.

Each is raised with a one-line message that names the bad value and what is allowed; the CLI
(`jaxllm.cli.run`) prints it as `error: ...` and exits 2, with no traceback unless `--debug`.
This module imports nothing, so any layer may raise these.
"""


class ConfigError(ValueError):
    """A config (file, field, override, CLI value) that cannot be built."""


class DataError(ValueError):
    """Bad input data or run directory: missing, empty or undecodable data, an incompatible or
    missing run directory or checkpoint, a bad tokenizer or prompt file."""


class ConversionError(ValueError):
    """A weights file, state_dict or Hugging Face / GGUF checkpoint that does not fit the model,
    or a feature the target format cannot express."""


class DecodeError(ValueError):
    """Bad decoding input: a prompt, a length, a sampling setting."""


class PlatformError(RuntimeError):
    """The requested backend is unknown or not installed."""


class TrainingError(RuntimeError):
    """A run that cannot go on: a loss or gradient non-finite too many steps in a row, a checkpoint
    that could not be written, a run directory another trainer holds. The run directory keeps its
    last good checkpoint."""


USER_ERRORS = (ConfigError, DataError, ConversionError, DecodeError, PlatformError, TrainingError)
