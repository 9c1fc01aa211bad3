"""What a record says about the machine and the command (records.py)."""

import torch

from tkpbench.records import _cpu_model, machine_key


def test_the_cpu_is_named_with_family_model_and_vector_unit_so_two_generations_differ(tmp_path):
    def cpu(family: str, model: str) -> str:
        block = f"processor\t: {{}}\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: AMD EPYC\n"
        path = tmp_path / f"cpuinfo-{family}"
        path.write_text(block.format(0) + "\n" + block.format(1).replace(f"model\t\t: {model}", "model\t\t: 99"))
        return _cpu_model(path)

    zen4, zen5 = cpu("25", "17"), cpu("26", "2")
    isa = torch.backends.cpu.get_cpu_capability()
    assert zen5 == f"AMD EPYC (family 26, model 2), {isa}"  # the first processor's block only
    assert machine_key({"cpu": zen4, "cores": 2}) != machine_key({"cpu": zen5, "cores": 2})
    assert _cpu_model(tmp_path / "absent").endswith(f", {isa}")  # no /proc/cpuinfo: platform's name
