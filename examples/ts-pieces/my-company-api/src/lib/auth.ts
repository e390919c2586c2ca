import { PieceAuth, Property } from '@activepieces/pieces-framework';
import { callApi, CompanyAuth } from './common/config';

export const companyAuth = PieceAuth.CustomAuth({
  displayName: 'Connection',
  required: true,
  props: {
    apiKey: PieceAuth.SecretText({
      displayName: 'API Key',
      description: 'Generate a key at https://internal.company.example/settings',
      required: true,
    }),
    environment: Property.StaticDropdown({
      displayName: 'Environment',
      required: true,
      options: {
        options: [
          { label: 'Production', value: 'prod' },
          { label: 'Staging', value: 'staging' },
          { label: 'Development', value: 'dev' },
        ],
      },
    }),
    baseUrl: Property.ShortText({
      displayName: 'Base URL',
      description: "Overrides the environment's URL (e.g. a local mock); leave empty normally",
      required: false,
    }),
  },
  validate: async ({ auth }) => {
    try {
      await callApi(auth as unknown as CompanyAuth, '/me');
      return { valid: true };
    } catch (error) {
      const cause = (error as Error & { cause?: Error }).cause;
      return { valid: false, error: `the API refused the key: ${(error as Error).message}${cause ? `: ${cause.message}` : ''}` };
    }
  },
});
