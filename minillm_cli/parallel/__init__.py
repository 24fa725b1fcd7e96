"""Several processes: accelerate helpers (`distributed`), FSDP2 sharding (`fsdp`) and the launch rules
shared by the launching command and every process (`launch_config`)."""
