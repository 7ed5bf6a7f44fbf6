"""Streaming (asynchronous) training: rollout, reward and training overlap through the store.

admission.py (how far the rollout may run ahead), feeders.py (the rollout thread, one class per
schedule), reward_stage.py (the reward thread), source.py (what the trainer's loop takes its
batches and weight syncs from), runner.py (`run_streaming`). docs/streaming.md tells the design.
"""
