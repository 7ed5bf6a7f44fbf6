"""Engines behind small interfaces (base.py): how roles train (FSDP2) and how rollouts generate
(embedded torch engine, vLLM, SGLang). Roles pick one through the registries in tidal/registry.py."""
