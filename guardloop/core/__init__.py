"""Floor 1: what every other part imports (labels, settings, data files, guidance, telemetry, errors).

Nothing here imports from storage, models, service, trainer, cli or bench.
"""
