"""Run directories: what a run holds and may delete (`rundir`), atomic checkpoints (`checkpoint`),
whether a resume is the same run (`resume_check`), and where outputs may go (`destinations`)."""
