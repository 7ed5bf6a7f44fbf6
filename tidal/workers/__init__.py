"""What runs inside worker processes: the Worker actor, roles, engines, rewards.

Nothing here imports the controller. Import submodules directly (`tidal.workers.worker`,
`tidal.workers.endpoint`); this package module stays empty so a role import stays cheap.
"""
