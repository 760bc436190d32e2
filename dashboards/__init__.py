"""The saelab app (installed as `saelab.dashboards`): a Dash server over one run directory; it reads what the
pipeline wrote and never trains or harvests by itself.

- `app`: `create_app` / `serve`, the page registry `PAGES` (the nav is built from it);
- `wsgi`: `create(run)`, the Flask server for gunicorn or any WSGI server, and the loopback guard of `saelab serve`;
- `data`: cached views over `saelab.run.RunDir` (SAEs, analyses, circuits, absorption results); a broken SAE folder
  is listed with its error and breaks only its own pages;
- `live`: the run's model and SAEs run on text a user types;
- `params`: every request parameter checked (`RequestError` otherwise);
- `components`: widgets, CSS, and the error box every `SaelabError` is shown in;
- `pages/`: one module per page.

Figures that notebooks share with the app are in `saelab.plots`.
"""
