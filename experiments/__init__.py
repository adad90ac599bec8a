"""Hydra entry points, sweeps and plots: the only place where core, sim and live meet."""
