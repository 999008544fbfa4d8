// The app's user-assigned managed identity: the storage host connection, Key Vault references and Dataverse (when
// the tenant allows managed identities as application users) all use it.
@description('Name of the user-assigned identity.')
param name string
param location string
param tags object

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output principalId string = identity.properties.principalId
output clientId string = identity.properties.clientId
