"""Shared pytest-benchmark setup: record what the numbers were measured on
(device, CPU model, torch / triton / numpy versions, git commit) in the
``machine_info`` of every benchmark JSON. See machine.py."""
import machine


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(machine.machine_info())
