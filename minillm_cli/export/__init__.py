"""Export one checkpoint of a run as a Hugging Face directory or a GGUF file, verified by reloading it.

`export(run_or_step_dir, opts)` (command.py) picks a step dir (`steps.pick_step`), loads the student
in fp32 (merging a LoRA adapter into its base unless told not to), computes reference logits on a
fixed prompt, writes the export into a temporary directory next to `opts.out`, reloads it from those
files alone and compares logits again (verify.py). Only a complete, verified export is renamed to
`opts.out`; anything else leaves no trace there.

Formats:
- `safetensors` (hf.py): `save_pretrained` (sharded above `shard_size`, with
  `model.safetensors.index.json`), tokenizer, generation config, the run's recipe and a model card
  `README.md` with the provenance (card.py).
- `gguf` (gguf.py): one `model-<type>.gguf` in llama.cpp's layout (llama architecture, byte-level BPE
  tokenizer), loadable by llama.cpp and by `transformers` with `gguf_file=`.

Layout of run and step dirs: docs/LAYOUT.md. Torch, transformers, peft and gguf are imported lazily
so that the CLI can import this package cheaply.
"""

from minillm_cli.export.command import export
from minillm_cli.export.options import ExportOptions, ExportResult

__all__ = ["ExportOptions", "ExportResult", "export"]
