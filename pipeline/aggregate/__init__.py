"""Mentions and daily aggregates: what analysts and BI tools read.

* `textmatch` – the catalogue compiled into a case/diacritics-insensitive whole-word matcher;
* `catalogue` – `settings.brands` mirrored into the `brands`/`products` tables (SQL joins on them);
* `mentions`  – text mentions of a day's posts (`text_mentions`) and the active model's image
  detections;
* `daily`     – `mention_daily` for one day, computed inside the database with set-based SQL
  (the same statements on SQLite and Postgres), and its demand signals;
* `jobs`      – the entry points the DAGs, the demo and the CLI call;
* `trends`, `report` – analyst output (series, CSV/JSON, plots, the HTML daily report);
* `views`     – the stable BI views documented in `sql/README.md`.
"""
