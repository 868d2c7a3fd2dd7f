"""The pipeline file: `schema` its values, `load` reading and checking it, `interpolate`."""
