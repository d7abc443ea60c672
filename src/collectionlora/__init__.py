"""collectionlora: many image-editing effect LoRAs and few-step sampling distilled into one LoRA."""

__version__ = "0.1.0"
