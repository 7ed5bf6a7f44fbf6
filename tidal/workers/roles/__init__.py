"""Roles: what a worker does (actor, critic, reference, rollout, reward), built as `Role(cfg, ctx)`.

Import the role modules directly (`tidal.workers.roles.actor`); this package stays empty so that
importing one role does not load every backend.
"""
