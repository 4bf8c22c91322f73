"""Print what FedTrain requires with the given extras, from pyproject.toml, one requirement a line.

The images install these first, constrained to requirements.lock, in a layer of their own: a change
to FedTrain's code then rebuilds only the small layer that installs the project itself, not torch.
Usage: ``python3 requirements.py pyproject.toml worker,tracking,kubeflow``.
"""

import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    """The project's dependencies and those of ``extras``, in order, each once."""
    with open(pyproject, "rb") as file:
        project = tomllib.load(file)["project"]
    found = list(project["dependencies"])
    for extra in extras:
        found += project["optional-dependencies"][extra]
    return list(dict.fromkeys(found))


if __name__ == "__main__":
    named = sys.argv[2].split(",") if len(sys.argv) > 2 else []
    print("\n".join(requirements(sys.argv[1], [extra for extra in named if extra])))
