"""tsdia: a Slurm/HPC job kit and experiment manager for PyTorch training."""

__version__ = "0.1.0"
