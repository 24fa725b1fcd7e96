"""Training data: reading rows and formats (`rows`), templates and tokenising (`encoding`), the teacher cache format."""
