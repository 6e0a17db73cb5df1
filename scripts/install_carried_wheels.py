"""Install, without pip or an index, the modules this Python lacks from the wheels scripts/gpu_check.sh --prepare
carried: a wheel is a zip, so unpacking the one whose tags fit this interpreter into a folder that goes on
PYTHONPATH installs it (none of these needs an entry point or a build step).

    python3 scripts/install_carried_wheels.py WHEELS_DIR TARGET_DIR
"""
import importlib.util
import os
import sys
import zipfile

# module to import -> distribution name of its wheel
NEEDED = {"torchattacks": "torchattacks", "tqdm": "tqdm", "yaml": "PyYAML", "safetensors": "safetensors",
          "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "packaging": "packaging",
          "exceptiongroup": "exceptiongroup", "tomli": "tomli", "typing_extensions": "typing_extensions"}


def fits(wheel: str, version=sys.version_info) -> bool:
    """Whether ``{dist}-{version}-{python}-{abi}-{platform}.whl`` runs on this x86-64 CPython."""
    py, abi, plat = wheel[:-len(".whl")].split("-")[-3:]
    if plat != "any" and "x86_64" not in plat:
        return False
    if abi == "abi3":
        return py.startswith("cp3") and int(py[3:]) <= version[1]
    return py in ("py3", "py2.py3", f"cp{version[0]}{version[1]}")


def main(wheels: str, site: str) -> int:
    os.makedirs(site, exist_ok=True)
    for module, dist in NEEDED.items():
        if importlib.util.find_spec(module) is not None:
            continue
        found = [w for w in sorted(os.listdir(wheels))
                 if w.lower().startswith(dist.lower().replace("-", "_") + "-") and fits(w)]
        if not found:
            print(f"carry: no wheel of {dist} for this Python ({sys.version.split()[0]})", file=sys.stderr)
            continue
        with zipfile.ZipFile(os.path.join(wheels, found[-1])) as z:
            z.extractall(site)
        print(f"carry: {module} from {found[-1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
