import { createAction } from '@activepieces/pieces-framework';
import { companyAuth } from '../auth';
import { callApi, CompanyAuth } from '../common/config';

export const healthCheckAction = createAction({
  auth: companyAuth,
  name: 'health_check',
  displayName: 'Health Check',
  description: 'Check API connectivity',
  requireAuth: true,
  props: {},
  async run(context) {
    const startTime = Date.now();
    // The guide's pieces read the connection's fields directly: `context.auth.apiKey`.
    const auth = context.auth as unknown as CompanyAuth;
    try {
      const { headers } = await callApi(auth, '/health');
      return { status: 'healthy', latency: Date.now() - startTime, apiVersion: headers.get('X-API-Version') };
    } catch (error) {
      return { status: 'unhealthy', error: (error as Error).message, latency: Date.now() - startTime };
    }
  },
});
