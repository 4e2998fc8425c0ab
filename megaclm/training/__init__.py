"""megaclm.training"""
