//! FSDP2 shard math.
