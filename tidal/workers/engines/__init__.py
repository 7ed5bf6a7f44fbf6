"""How roles train and infer (FSDP2) and how rollouts generate (embedded torch engine, vLLM)."""
