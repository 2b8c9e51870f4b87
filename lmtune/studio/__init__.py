"""``lmtune studio``: a local web app over a workspace's data, configs, runs and studies (see app.py)."""
