"""The report's four sections, one module each (inference, training, pipeline, scaling), in the order they are
numbered; each `*_section` function measures and returns a report.Section. inputs.py holds what they read."""
