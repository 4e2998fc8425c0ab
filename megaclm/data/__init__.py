"""megaclm.data"""
