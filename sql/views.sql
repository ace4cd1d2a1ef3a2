-- BI views over mention_daily and demand_signal, and the indexes they need.
-- GENERATED from pipeline/aggregate/views.py by `python -m pipeline.aggregate.views`;
-- `brandmon db upgrade` already creates them. Column meanings: sql/README.md.

CREATE OR REPLACE VIEW v_daily_trend AS
SELECT day, brand, product, platform, source,
       posts, images, unique_authors, reposts, expected_mentions,
       rolling_7, rolling_28, wow_change, zscore, spike, share_of_voice,
       model_version, computed_at, baseline
FROM mention_daily;

COMMENT ON VIEW v_daily_trend IS 'Daily mentions per brand x product x platform x source with demand signals (see sql/README.md)';

CREATE OR REPLACE VIEW v_share_of_voice AS
SELECT day, brand, platform, source, posts,
       SUM(posts) OVER (PARTITION BY day, platform, source) AS total_posts,
       share_of_voice,
       RANK() OVER (PARTITION BY day, platform, source ORDER BY posts DESC) AS brand_rank
FROM mention_daily
WHERE product = '*';

COMMENT ON VIEW v_share_of_voice IS 'Each brand share of all catalogue-brand mentions per day, platform and source';

CREATE OR REPLACE VIEW v_spikes AS
SELECT day, brand, product, platform, source, posts, baseline,
       posts - baseline AS excess, zscore, expected_mentions, model_version
FROM mention_daily
WHERE spike;

COMMENT ON VIEW v_spikes IS 'Days whose mentions are a spike: z-score >= 3 against the trailing 28 days and >= 5 posts';

CREATE OR REPLACE VIEW v_forecast AS
SELECT f.brand, f.product, f.platform, f.issued_on, f.day, f.horizon_days,
       f.expected, f.lower_95, f.upper_95, m.posts AS actual_posts,
       f.method, f.history_days, f.backtest_mae, f.baseline_mae, f.mase, f.beats_baseline, f.computed_at
FROM demand_signal f
LEFT JOIN mention_daily m
  ON m.day = f.day AND m.brand = f.brand AND m.product = f.product AND m.platform = f.platform
 AND m.source = 'any'
WHERE f.issued_on = (SELECT MAX(g.issued_on) FROM demand_signal g
                     WHERE g.brand = f.brand AND g.product = f.product AND g.platform = f.platform);

COMMENT ON VIEW v_forecast IS 'Latest forecast of daily mentions per brand with 95% prediction intervals and backtest errors';

CREATE INDEX IF NOT EXISTS ix_mention_daily_spikes ON mention_daily (day) WHERE spike;
