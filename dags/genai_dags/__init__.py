"""Helpers of the GenAI DAGs: platform config, stage specs, runtimes, params, planning and local tools."""
