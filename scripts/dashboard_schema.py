#!/usr/bin/env python3
"""Type-checks the Grafana dashboard against Grafana's own schema (`@grafana/schema`).

Writes the dashboard JSON as a TypeScript object literal annotated with the schema's
`Dashboard` type and runs `tsc --strict --noEmit` on it: an unknown property, a missing
required one or a value of the wrong type is an error. The schema's string enums (a threshold
mode, a colour mode, a value mapping's type) are written as enum members, since TypeScript
does not take a string literal for a string enum. npm installs the two pinned packages into
target/dashboard-schema on first use.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "target" / "dashboard-schema"
DASHBOARD = ROOT / "dashboards" / "loopwatch.json"
TYPES = "node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen.d.ts"

# (parent key, key) -> the string enum the schema types that value with.
ENUM_FIELDS = {
    ("thresholds", "mode"): "ThresholdsMode",
    ("color", "mode"): "FieldColorModeId",
    ("mappings", "type"): "MappingType",
}


def install():
    WORK.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "scripts" / "dashboard-schema" / "package.json", WORK / "package.json")
    if not (WORK / TYPES).exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=WORK, check=True)


def string_enums():
    """Each string enum of the schema: its name -> {value: member}."""
    text = (WORK / TYPES).read_text()
    enums = {}
    for name, body in re.findall(r"export declare enum (\w+) \{([^}]*)\}", text):
        members = dict((v, m) for m, v in re.findall(r'(\w+) = "([^"]*)"', body))
        if members:
            enums[name] = members
    return enums


def to_ts(value, enums, parent=None, key=None):
    enum = ENUM_FIELDS.get((parent, key))
    if enum and isinstance(value, str):
        member = enums.get(enum, {}).get(value)
        if member is None:
            sys.exit(f"{parent}.{key} = {value!r} is not a value of the schema's {enum}")
        return f"{enum}.{member}"
    if isinstance(value, dict):
        # A dict in a list is typed by the list's key.
        owner = key if key is not None else parent
        items = ",\n".join(f"{json.dumps(k)}: {to_ts(v, enums, owner, k)}" for k, v in value.items())
        return "{\n" + items + "\n}"
    if isinstance(value, list):
        return "[\n" + ",\n".join(to_ts(v, enums, key, None) for v in value) + "\n]"
    return json.dumps(value)


def main():
    if not shutil.which("npm"):
        sys.exit("npm is required (the Node.js package manager)")
    install()
    enums = string_enums()
    dashboard = json.loads(DASHBOARD.read_text())
    used = sorted(set(ENUM_FIELDS.values()))
    (WORK / "check.ts").write_text(
        f"import type {{ Dashboard }} from '@grafana/schema';\n"
        f"import {{ {', '.join(used)} }} from '@grafana/schema';\n\n"
        f"export const dashboard: Dashboard = {to_ts(dashboard, enums)};\n"
    )
    (WORK / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {"strict": True, "noEmit": True, "module": "nodenext",
                            "moduleResolution": "nodenext", "target": "es2022",
                            "skipLibCheck": True},
        "files": ["check.ts"],
    }))
    tsc = WORK / "node_modules" / ".bin" / "tsc"
    r = subprocess.run([str(tsc), "-p", "."], cwd=WORK, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout + r.stderr)
        sys.exit(f"{DASHBOARD.relative_to(ROOT)} does not match @grafana/schema's Dashboard "
                 f"(lines refer to {(WORK / 'check.ts').relative_to(ROOT)})")
    print(f"{DASHBOARD.relative_to(ROOT)}: {len(dashboard.get('panels', []))} panels match "
          f"@grafana/schema's Dashboard (tsc --strict)")


if __name__ == "__main__":
    main()
