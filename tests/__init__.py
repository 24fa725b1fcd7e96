"""The test suite, a package: its helpers are imported as tests.tiny, tests.gguf_tiny, tests.conftest."""
