"""The project's error types: each carries a one-line message naming the file and field at fault."""


class CollectionLoraError(Exception):
    """Base class; the CLI prints the message on one line and exits non-zero."""


class ConfigError(CollectionLoraError):
    """params.yaml (or another config file) is invalid."""


class BankError(CollectionLoraError):
    """The effect bank (bank.yaml, images, LoRA files) is invalid."""


class LoraFileError(BankError):
    """A LoRA file cannot be used: not safetensors, truncated, bad keys or shapes, non-finite values."""


class JudgeFileError(CollectionLoraError):
    """A saved effect judge cannot be loaded: missing or malformed files, wrong tensors."""


class RolloutError(CollectionLoraError):
    """Teacher rollouts are missing, malformed, or stale against the current bank."""


class CaptionError(CollectionLoraError):
    """The AOP captioner (an OpenAI-compatible VLM endpoint) gave no usable caption for an effect."""


class PipelineError(CollectionLoraError):
    """The Kubeflow pipeline cannot be compiled, uploaded or run as asked (bad IR, host, token, params)."""


class OutputError(CollectionLoraError):
    """A stage cannot write its output folder: disk full, read-only, no permission, file too large
    (what was there before is left as it was)."""


class OutputInUseError(OutputError):
    """Another run (another terminal, a retried task) is writing the same output folder."""
