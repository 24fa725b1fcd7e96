"""Models: resolving and loading (`loading`), GGUF conversion and model directories (`dirs`), students built
from a teacher, shapes from config.json, CPU process settings."""
