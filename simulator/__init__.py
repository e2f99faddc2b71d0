"""The simulated model server: a separate program, reached over HTTP like any provider."""

from __future__ import annotations

from simulator.plan import SIM_SETTINGS_KEY, SIM_STATS_KEY, SimulatorSettings, SimulatorStats
from simulator.server import create_simulator_app, run_simulator
from simulator.text import chat_input_text_of, input_text_of, simulated_text

# The names the gateway, the tests and the CLI rely on; the modules hold the rest.
__all__ = [
    "SIM_SETTINGS_KEY",
    "SIM_STATS_KEY",
    "SimulatorSettings",
    "SimulatorStats",
    "chat_input_text_of",
    "create_simulator_app",
    "input_text_of",
    "run_simulator",
    "simulated_text",
]
