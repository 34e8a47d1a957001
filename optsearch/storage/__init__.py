"""Where studies live: Optuna RDB storages and the gRPC storage proxy, artifacts, records, notes."""

import os

# gRPC's C core logs to stderr on its own (a taken port, a proxy away); our errors say it in one
# line. Read once, when grpc is first imported: before any module here imports it.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
