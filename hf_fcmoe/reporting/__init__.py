"""Plots and reports built from run outputs (metrics rows, diagnostics)."""

from hf_fcmoe.reporting.conflicts import plot_conflict_heatmap

__all__ = ["plot_conflict_heatmap"]
