-- Example analyst queries over the brandmon BI views. Every query runs on Postgres and SQLite.
-- Conventions: product '*' = all products of the brand, platform '*' = all platforms,
-- source 'any' = text or image. Days are UTC.

-- 1. Daily trend of one brand over a month, all platforms, any source.
SELECT day, posts, rolling_7, rolling_28, wow_change, spike
FROM v_daily_trend
WHERE brand = 'Acme' AND product = '*' AND platform = '*' AND source = 'any'
  AND day BETWEEN '2026-10-01' AND '2026-10-31'
ORDER BY day;

-- 2. The same trend split by platform (one column per platform in your BI tool's pivot).
SELECT day, platform, posts
FROM v_daily_trend
WHERE brand = 'Acme' AND product = '*' AND platform <> '*' AND source = 'any'
  AND day BETWEEN '2026-10-01' AND '2026-10-31'
ORDER BY day, platform;

-- 3. How do people mention the brand: text only, image only, or both?
SELECT source, SUM(posts) AS posts, SUM(expected_mentions) AS expected
FROM v_daily_trend
WHERE brand = 'Acme' AND product = '*' AND platform = '*' AND source IN ('text', 'image', 'both')
  AND day BETWEEN '2026-10-01' AND '2026-10-31'
GROUP BY source;

-- 4. Products of a brand ranked by posts last week.
SELECT product, SUM(posts) AS posts, SUM(unique_authors) AS author_days
FROM v_daily_trend
WHERE brand = 'Acme' AND product <> '*' AND platform = '*' AND source = 'any'
  AND day BETWEEN '2026-10-24' AND '2026-10-30'
GROUP BY product
ORDER BY posts DESC;

-- 5. Share of voice per brand on one day (all platforms, any source).
SELECT brand, posts, total_posts, share_of_voice, brand_rank
FROM v_share_of_voice
WHERE day = '2026-10-19' AND platform = '*' AND source = 'any'
ORDER BY brand_rank;

-- 6. Share of voice over a period (sum of posts, not the mean of daily shares).
SELECT brand, SUM(posts) AS posts,
       CAST(SUM(posts) AS DOUBLE PRECISION) / NULLIF(SUM(SUM(posts)) OVER (), 0) AS share_of_voice
FROM v_share_of_voice
WHERE platform = '*' AND source = 'any' AND day BETWEEN '2026-10-01' AND '2026-10-31'
GROUP BY brand
ORDER BY posts DESC;

-- 7. Spikes since a date, strongest first.
SELECT day, brand, product, platform, source, posts, baseline, excess, zscore
FROM v_spikes
WHERE day >= '2026-10-01'  -- on Postgres: day >= CURRENT_DATE - 30
ORDER BY zscore DESC
LIMIT 20;

-- 8. Week-over-week movers: brands whose 7-day mean changed most on a given day.
SELECT brand, rolling_7, wow_change
FROM v_daily_trend
WHERE day = '2026-10-30' AND product = '*' AND platform = '*' AND source = 'any'
  AND wow_change IS NOT NULL
ORDER BY ABS(wow_change) DESC;

-- 9. Image mentions corrected for the detector's precision and recall.
SELECT day, posts AS detected, expected_mentions AS expected_true, model_version
FROM v_daily_trend
WHERE brand = 'Acme' AND product = '*' AND platform = '*' AND source = 'image'
  AND day BETWEEN '2026-10-01' AND '2026-10-31'
ORDER BY day;

-- 10. Re-post ratio: how much of the image chatter re-shares the same pictures?
SELECT day, posts, reposts, images,
       CAST(reposts AS DOUBLE PRECISION) / NULLIF(posts, 0) AS repost_ratio
FROM v_daily_trend
WHERE brand = 'Acme' AND product = '*' AND platform = '*' AND source = 'any'
  AND day BETWEEN '2026-10-01' AND '2026-10-31'
ORDER BY day;
