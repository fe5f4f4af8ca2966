#!/usr/bin/env python3
"""Writes api/schema/pve-api.json: the Proxmox VE API schema (../shared/pve-api/apidata.json,
the official PVE 9.1 apidata.js as JSON) flattened to one entry per path and method, with what
the /api2/json layer needs to route, validate parameters and check permissions: `parameters`
(JSON schema, descriptions dropped), `permissions` (descriptions dropped), `allowtoken`.

Usage: scripts/gen-pve-schema.py [APIDATA] > api/schema/pve-api.json
"""
import json
import sys

DROP = {"description", "verbose_description", "typetext", "format_description", "title",
        "print-width", "renderer", "default_key_doc", "instance-types"}


def strip(x, properties=False):
    """Drops documentation keys, but never a parameter's name (`description`, `title` are
    parameters of many endpoints): the keys of a `properties` map are all kept."""
    if isinstance(x, dict):
        return {k: strip(v, k == "properties" and not properties)
                for k, v in x.items() if properties or k not in DROP}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "../shared/pve-api/apidata.json"
    with open(src) as f:
        tree = json.load(f)
    out = []

    def walk(nodes):
        for node in nodes:
            for method, info in sorted((node.get("info") or {}).items()):
                entry = {"path": node["path"], "method": method,
                         "parameters": strip(info.get("parameters", {})),
                         "allowtoken": info.get("allowtoken", 1)}
                if "permissions" in info:
                    entry["permissions"] = strip(info["permissions"])
                out.append(entry)
            walk(node.get("children", []))

    walk(tree)
    out.sort(key=lambda e: (e["path"], e["method"]))
    sys.stdout.write("[\n" + ",\n".join(json.dumps(e, separators=(",", ":"), sort_keys=True) for e in out) + "\n]\n")


main()
