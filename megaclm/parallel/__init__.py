"""megaclm.parallel"""
