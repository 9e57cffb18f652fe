"""The leaf every layer may import: the config base class, telemetry of the job's actors, the
model store and small networking helpers. It imports nothing else of rft."""
