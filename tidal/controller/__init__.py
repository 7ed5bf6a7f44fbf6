"""The single controller: resource pools, worker groups, dispatch, and the programs that use them.

Import submodules directly (`tidal.controller.worker_group`, `tidal.controller.dispatch`, ...);
this package module stays empty so importing one piece does not start pulling in the rest.
"""
