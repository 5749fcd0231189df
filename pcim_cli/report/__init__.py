"""Looking at results: pictures and the HTML report, the comparison with baselines, store status."""
