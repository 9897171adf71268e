"""Reading runs back: run and series analysis behind ``nerve report``, plots and layer tables."""
