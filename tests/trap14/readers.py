"""Run inside the trap 1.4.0 venv: TraP 1.4.0's readers on an export; results as JSON.

Usage: python readers.py EXPORT.db OUT.json
"""

import json
import sys

import sqlalchemy
from trap.post_processing import construct_lightcurves, construct_varmetric

engine = sqlalchemy.create_engine(f"sqlite:///{sys.argv[1]}")
bands = construct_lightcurves(engine, attribute="int_flux")
varmetric = construct_varmetric(engine)
out = {
    "lightcurves": [{"columns": list(b.columns), "index": [int(i) for i in b.index],
                     "values": [[None if v != v else float(v) for v in row] for row in b.to_numpy()]}
                    for b in bands],
    "varmetric": json.loads(varmetric.to_json(orient="records", date_format="iso")),
}
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
