"""Command bodies behind `cli.py`: training runs (`train`), multi-process launch, the quickstart pipeline,
`plan`, the teacher-cache build, `--json` run summaries."""
