"""Online serving's replica process (`python -m lepton.workloads.serving.replica`) and its
dynamic batcher. See docs/serving.md."""
