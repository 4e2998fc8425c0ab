"""megaclm.model"""
