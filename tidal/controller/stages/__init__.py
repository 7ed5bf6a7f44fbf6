"""The stages of an RL step, one home for the sync and the streaming runner.

base.py (the Stage declaration: reads / writes), rollout.py (generate, evaluate), scoring.py
(score, reward.on_error, DAPO's filter, reward baselines), model.py (log-probs, values, updates),
advantages.py (+ advantage_task.py, the task it runs), batch_tasks.py (small whole-step tasks),
experience.py (the stages in order, and the sync sampler), pipeline.py (every stage of a job).
"""
