"""megaclm.config"""
